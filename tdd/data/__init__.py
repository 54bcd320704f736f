"""Data modules. A batch is ``{"pixel_values": B x 3 x H x W in [-1, 1], "caption": [str]}``."""
