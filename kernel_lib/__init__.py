"""BYU flagellar-motor pipeline.

Stages: read tomogram -> percentile-normalise -> resample -> 2.5D slice stacks -> heatmap model ->
3D peak decoding -> 3D verifier of the top peaks -> threshold -> submission rows. Coordinates are (z, y, x) = (axis 0, 1, 2) in
the original tomogram's voxels unless a name says otherwise.
"""

__version__ = "0.1.0"
