"""Shared test helpers: tiny datasets and configs, reference weights, a fake OpenAI server, child-process scripts."""
