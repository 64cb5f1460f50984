"""Calibration and evaluation data: dataset specs to records (records), record shapes to chat messages (chat), records to token ids with the model's tokenizer (tokens)."""
