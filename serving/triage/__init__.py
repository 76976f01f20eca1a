"""Study-level triage: an abnormality score per study, a priority flag, and the worklist."""
