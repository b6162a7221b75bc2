"""Where the draft runs: the DraftBackend interface and its placements (in process, process, Ray)."""
