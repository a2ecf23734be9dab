"""How rounds reach the sites: in-process (the workspace calls fl_crew_reddit/site directly on one shared model) or
on Flower's Deployment Engine (flower.py: ServerApp / ClientApp around server/ and site/, and a local launcher)."""
