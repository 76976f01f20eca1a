"""DIMSE in: a C-STORE SCP (pynetdicom) that spools instances durably and hands studies to the gateway."""
