-- Route ultrasound to the FUSC PACS worker: every image instance of an ultrasound SOP class (and Secondary
-- Capture from an ultrasound modality) that Orthanc stores is sent by C-STORE to the modality
-- "fusc-integration" (orthanc.json), whose receiver queues it durably and writes the result back.
-- Loaded by fusc-routing.json ("LuaScripts"). Orthanc runs SendToModality as a job: when the worker is down
-- that job fails and is not retried, so run the worker's DICOMweb watcher (FUSC_PACS_WATCH=orthanc-changes)
-- as well; it finds what the push missed, and the worker's queue takes each instance once.

local FUSC_MODALITY = 'fusc-integration'

local ULTRASOUND = {
  ['1.2.840.10008.5.1.4.1.1.6.1'] = true,  -- Ultrasound Image Storage
  ['1.2.840.10008.5.1.4.1.1.3.1'] = true,  -- Ultrasound Multi-frame Image Storage
}
local SECONDARY_CAPTURE = {
  ['1.2.840.10008.5.1.4.1.1.7'] = true,    -- Secondary Capture Image Storage
  ['1.2.840.10008.5.1.4.1.1.7.2'] = true,  -- Multi-frame Grayscale Byte SC
  ['1.2.840.10008.5.1.4.1.1.7.3'] = true,  -- Multi-frame Grayscale Word SC
  ['1.2.840.10008.5.1.4.1.1.7.4'] = true,  -- Multi-frame True Color SC
}

function OnStoredInstance(instanceId, tags, metadata, origin)
  -- Objects written back by the worker (its SRs) are of another class and stay here.
  local class = metadata['SopClassUid']
  if ULTRASOUND[class] or (SECONDARY_CAPTURE[class] and tags['Modality'] == 'US') then
    SendToModality(instanceId, FUSC_MODALITY)
  end
end
