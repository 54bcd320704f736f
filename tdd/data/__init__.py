"""Data modules. A batch is ``{"pixel_values": B x 3 x H x W in [-1, 1], "caption": [str]}``;
the file sources (folder, webdataset) add ``original_size`` and ``crop_top_left`` (B x 2: h, w
and top, left), which SDXL teachers take as size conditioning."""
