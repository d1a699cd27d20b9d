#include "dicom/dicom.h"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcuid.h>

extern "C" const char *rr_dicom_version(void) {
  try {
    return OFFIS_DCMTK_VERSION_STRING;
  } catch (...) {
    return "unknown";
  }
}
