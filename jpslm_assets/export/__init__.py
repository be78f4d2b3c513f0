"""Stage 3: merge each adapter, convert it to GGUF F16 and Q4_K_M, deploy it and answer the test questions. ``assets.py`` holds the assets; every other module is a plain function module."""
