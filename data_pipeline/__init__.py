"""data_pipeline: radiographs and radiologists' boxes -> versioned, trainable YOLO datasets.

Modules, in the order a dataset is built:

- ``dicom_io``: DICOM/PNG/JPEG -> float32 0..1 display pixels (Modality LUT, VOI, MONOCHROME1); typed errors.
- ``annotations``: VinDr CSV validation (pandera), bad rows quarantined with line numbers.
- ``fusion``: readers fused per image and class with Weighted Boxes Fusion.
- ``quality``: image/label checks and near duplicates; ``split``: patient-level stratified split.
- ``export`` / ``executors``: the pure per-image function and where it runs (process pool or Ray Data).
- ``versioning``: content-hashed versions, S3 publish/fetch; ``feedback``: gateway corrections from S3.
- ``drift``: reference statistics and PSI/KS comparison used by the gateway.
- ``synth``: synthetic chest phantoms with findings and simulated readers.
- ``geometry``: letterbox and box mappings shared with training and serving; ``store``: S3 access.
- ``ingest``: :func:`build_dataset`, the whole build; ``cli``: ``cxr data``.
- ``dicom_guard``: the one guarded reader every DICOM from outside passes; ``hostile``: hostile
  DICOMs for the fuzz tests and the ``hostile_corpus`` benchmark; ``install_secret``: the per-install
  secret; ``offline``: the closed-network switches every component applies.
"""
