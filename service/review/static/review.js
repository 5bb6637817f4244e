// fusc review: "Tick all" and shift-click ranges on the image grids. The pages work without it.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("button.select-all").forEach(function (btn) {
      btn.addEventListener("click", function () {
        var boxes = document.querySelectorAll('input[type=checkbox][form="' + btn.dataset.form + '"]');
        var all = Array.prototype.every.call(boxes, function (b) { return b.checked; });
        boxes.forEach(function (b) { b.checked = !all; });
      });
    });
    var last = null;
    var boxes = Array.prototype.slice.call(document.querySelectorAll('figure.tile input[type=checkbox]'));
    boxes.forEach(function (box) {
      box.addEventListener("click", function (ev) {
        if (ev.shiftKey && last !== null) {
          var a = boxes.indexOf(last), b = boxes.indexOf(box);
          boxes.slice(Math.min(a, b), Math.max(a, b) + 1).forEach(function (x) { x.checked = box.checked; });
        }
        last = box;
      });
    });
  });
})();
