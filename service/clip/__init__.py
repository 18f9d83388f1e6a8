"""CLIP-guided expert selection: embed each image with CLIP's image tower and run the expert whose
route prompts it matches best (FishDet-M's idea; design in ``docs/clip.md``).

Modules: ``config`` (the ``routing`` settings block), ``manifest`` (the exported model directory),
``preprocess`` (CLIP's exact image transform), ``towers`` (onnxruntime image and text towers),
``routing`` (route tables, softmax, fallbacks, drift), ``selection`` (building it all for the app),
``export`` (PyTorch checkpoint -> the directory) and ``cli`` (``tta-serve export-clip``).

Importing this package is cheap: onnxruntime and torch load only with the modules that need them.
"""
