"""The replica's wire contract: request schemas (OpenAI completions, KServe v2 tensors).

The errors these raise live one level up, in `replica/errors.py`, so batchers can share them.
"""
