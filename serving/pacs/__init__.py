"""The PACS round trip: where results go back to (destinations), the durable outbox, DICOMweb pull."""
