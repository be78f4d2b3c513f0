"""The SQL marts over the score tables, and ``jpslm-sql`` (project, runs, models, score import). ``assets.py`` holds the assets."""
