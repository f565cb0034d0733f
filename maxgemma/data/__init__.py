"""The data side: tokenizer, `prepare` (text -> ArrayRecord shards), the grain pipeline, SFT and
preference pairs (DPO).

Trainer entry points: `maxgemma.data.pipeline.make_train_iterator` / `make_eval_iterator` and
`maxgemma.data.checkpointing` (orbax args for the iterator state).
"""
