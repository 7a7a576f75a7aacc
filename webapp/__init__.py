"""The web app's own code, beside app.py (the page): what the public app does with a request before and
around captioning. The captioner library (captioner/) knows nothing of it.

* handlers.py: `CaptionPage`, what each of the page's events does (app.py wires them; their parameters are the
  API's), and how a caption is shown: the candidates table, the words' probabilities, the model's facts.
* uploads.py: a request's image, read only from Gradio's upload cache (or a data: URL, or an example by index),
  decoded in the library's sandboxed workers; the errors a request gets, as sentences.
* middleware.py: `RequestLimits`, the ASGI middleware that bounds every request before Gradio reads it,
  and the Gradio settings that go with it.
* many_photos.py: the "Many photos" tab's work: up to a few dozen uploads captioned, CSV and JSON results.
* models.py: `ModelChoices`, the models a request may choose (the default, the bundled ResNet50 and ensemble), each
  loaded on first use (the ensemble is weights/ensemble/, a captioner.Ensemble, which the handlers use as a Captioner).
"""
