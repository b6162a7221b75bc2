"""The target's side of drafting: proposer, step records, attention capture, schedules, failures."""
