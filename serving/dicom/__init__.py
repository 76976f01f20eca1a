"""DICOM in and out of the gateway: STOW-RS parsing, the Structured Report, de-identification."""
