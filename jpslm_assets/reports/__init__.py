"""The report: figures from every stage (the catalogue), the document and its assets (``assets.py``)."""
