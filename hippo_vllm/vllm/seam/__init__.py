"""Where vLLM meets hippo: plugin entry, config rewrite, hippo workers and runner, fixes to vLLM."""
