"""The Ray layer: the checkpointer actor and its handle, worker and eval clients, metrics, Train/Tune."""
