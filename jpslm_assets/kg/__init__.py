"""Stage 0, the knowledge graph: its assets (``assets.py``), the records and their checks (``graph.py``) and the tables built from them (``tables.py``)."""
