"""`llmcore launch`: training on several nodes through DeepSpeed's runner (`cli.py`), and what each
rank runs over ssh (`node.py`). The DeepSpeed configs `--deepspeed NAME` picks are the engine's and
ship beside it (`llmcore.train.deepspeed_config`); this package only plans and starts processes.
"""
