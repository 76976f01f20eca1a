"""DIMSE in: a C-STORE SCP (pynetdicom) that spools instances durably and hands settled studies to the gateway."""
