"""LLM-as-judge: the rubric and its score parsing, the judge controls, citations and the judging figures. ``assets.py`` holds the assets; every other module is a plain function module."""
