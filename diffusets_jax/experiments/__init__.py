"""Orchestration above the library: evaluation protocols, diagnostics, the paper's studies and the demo.

Each module here composes the library (pipeline, metrics, io, data) into one experiment; nothing below this
package imports from it.
"""
