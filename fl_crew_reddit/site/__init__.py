"""One federated client ("site"): its own data folder, local training and local evaluation.

A site receives the global adapter's arrays and a fit config (or a split name) and answers with update arrays,
num_examples and metrics (or NLL sums and token counts). Raw text and token ids never leave it."""
from fl_crew_reddit.site.app import EvalSums, Site, SiteFitResult
from fl_crew_reddit.site.data import SPLITS, SiteData

__all__ = ["EvalSums", "SPLITS", "Site", "SiteData", "SiteFitResult"]
