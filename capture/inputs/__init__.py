"""Inputs: prompt files, chat templates and tokenisation, prompt variants, and what of each prompt is stored."""
