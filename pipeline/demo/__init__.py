"""The demo look-alikes of NSD (:mod:`pipeline.demo.nsd`, make-demo) and cc2017 (:mod:`pipeline.demo.video`,
make-demo-video): the top layer, since planting their encoding models runs the project's own CLIP code
(:mod:`pipeline.demo.tower` trains the tiny tower they use)."""
