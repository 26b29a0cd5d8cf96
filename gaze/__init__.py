"""Gaze annotations: fixation CSVs -> heatmaps -> dense-CRF gaze maps -> quality report.

    gaze.fixations.read_fixations(csv, columns, coords)  -> {id: FixationSet}   (GazeMedSeg or generic CSVs)
    gaze.heatmap.gaze_heatmap(fix, H, W, sigma)           -> float16 (H, W)
    gaze.crf.refine(image, prob, backend, device)         -> float32 (H, W)
    gaze.manifest                                         OUT/manifest.json: what each map was made from
    gaze.pipeline.make_gaze_maps(csv, root, data, ...)    -> report dict   (CLI: python -m gaze)

Nothing here imports torch unless the torch CRF backend is chosen.
"""
