"""The reproduction behind ``reproduce.py``: its parts as data (``spec.Part``, registered in ``parts``), the
``runner`` that runs the repository's scripts as reusable steps, and the results page rendered from
results.json (``render``)."""
