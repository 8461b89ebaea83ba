"""Imaging stages, bottom up: ``io`` (reading images, DICOM series and headers), ``exclusion``
(a case that cannot be used and its recorded reason), ``checks`` (geometry, HU, non-finite
values), ``segmentation`` (TotalSegmentator class maps from three backends), ``segment`` and
``preprocess`` (the two per-case stages), ``storage`` (where a case's outputs live), ``stage``
(running a stage over cases) and ``qc`` (the cohort's QC tables)."""
