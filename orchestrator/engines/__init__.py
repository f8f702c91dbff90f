"""Engines that run folio's stages somewhere other than this process's threads.
"""
