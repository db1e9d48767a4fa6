import sys

from camelid.kernels import main

sys.exit(main())
