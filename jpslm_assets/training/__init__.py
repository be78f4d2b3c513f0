"""Stages 1 and 2: base models, QLoRA adapters per n and per model, test-set NLL, the scale curve and n*. ``assets.py`` holds the assets; every other module is a plain function module."""
