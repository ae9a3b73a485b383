"""Audio moment retrieval (SPEC 12): where in a long recording the sound a sentence describes is, as [start, end]
seconds. A QD-DETR (AM-DETR) over frame and token features, its losses and matching, and the challenge's metrics."""
