"""Conversation datasets (jsonl), packing, conversation modes, and the synthetic video world."""
