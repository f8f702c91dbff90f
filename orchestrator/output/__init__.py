"""Reading results back: JSONL and Markdown export, and ``folio show``.
"""
