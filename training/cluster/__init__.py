"""The clustering half of FUSC: kNN mining, the FUSC cluster step, self-labeling, OOD calibration."""
