"""The stages a page goes through, one module each: sources, decode (+ page headers), text
lines, orientation, layout (+ post-processing, the GPU-resident stage), coverage, crop,
recognition (rapidocr, vLLM and its model profiles), the SQLite sink.
"""
