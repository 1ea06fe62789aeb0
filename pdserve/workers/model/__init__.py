"""Llama-family model runner that executes layer by layer with explicit operator boundaries."""
