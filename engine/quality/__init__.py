"""Whether a model is better: the eval suite, the gate, the forgetting matrix, the replay pool, and
the files the gate held.
"""
