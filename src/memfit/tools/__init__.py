"""What users run on top: `verify` (the proof), `bench` (the frontier of strategies and plans) and `report`
(tables, plots and files written whole). It builds on `memfit.planning` and `memfit.core`."""
