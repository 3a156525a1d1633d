"""Integrations of dataflex into other training loops (`dataflex.integrations.hf_trainer`: HF Trainer)."""
