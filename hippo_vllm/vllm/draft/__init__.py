"""The draft's side: the draft worker, its engine, KV cache, views and chunk drafting."""
