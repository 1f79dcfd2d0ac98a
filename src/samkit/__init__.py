"""samkit: Segment Anything with the official checkpoints, faster, with tools around it."""
