"""One model instance over Ray actors: the Ray executor, the shard and expert-group actors, the
all_to_all exchange and the expert placement."""
