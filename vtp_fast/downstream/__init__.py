"""What needs both training and evaluation: the generative probe (a DiT trained on a tokenizer's latents,
scored by gFID). Above vtp_fast.train and vtp_fast.eval; neither imports it (see tests/test_layers.py)."""
