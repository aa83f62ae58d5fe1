"""The Beam shells: DoFns and composite PTransforms that drive the engine-free core.

Each module maps one stage of the core (``transforms/``, ``models/``) onto Beam's
state, timers, side inputs and outputs, and does little else; the domain logic
stays in the core so other engines run the same code (docs/architecture.md).
"""
