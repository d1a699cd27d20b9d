// DICOM SR writer/reader for TID 1500 measurement reports with DCMTK's dcmsr.
// See sr.h for the document structure and the contract.
extern "C" {
#include "core/error.h"
#include "core/log.h"
}

#include "dicom/sr.h"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcdeftag.h>
#include <dcmtk/dcmdata/dcdict.h>
#include <dcmtk/dcmdata/dcfilefo.h>
#include <dcmtk/dcmdata/dcuid.h>
#include <dcmtk/dcmdata/dcvrdt.h>
#include <dcmtk/dcmsr/dsrdoc.h>
#include <dcmtk/oflog/oflog.h>

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace {

const char *const kLogModule = "dicom";

// Thrown inside this file only; every entry point turns it into a code.
struct Fail {
  int code;
  std::string text;
};

[[noreturn]] void fail(int code, const std::string &text) {
  throw Fail{code, text};
}

void check(const OFCondition &c, const char *what) {
  if (c.bad())
    fail(RR_DICOM_EDCMTK, std::string(what) + ": " + c.text());
}

void set_error(rr_dicom_sr_error_t *err, const std::string &text) {
  if (err)
    snprintf(err->text, sizeof(err->text), "%s", text.c_str());
}

std::once_flag g_sr_once;

void sr_global_setup() {
  // DCMTK's own logger writes to stderr outside the engine's log format.
  OFLog::configure(OFLogger::ERROR_LOG_LEVEL);
}

bool empty(const char *s) {
  return s == nullptr || *s == '\0';
}

bool valid_uid(const char *u) {
  if (empty(u))
    return false;
  size_t n = strlen(u);
  if (n > 64 || u[0] == '.' || u[n - 1] == '.')
    return false;
  for (size_t i = 0; i < n; i++) {
    bool digit = u[i] >= '0' && u[i] <= '9';
    if (!digit && u[i] != '.')
      return false;
    if (u[i] == '.' && u[i + 1] == '.')
      return false;
    // A component has no leading zero unless it is "0".
    if (u[i] == '0' && (i == 0 || u[i - 1] == '.') && u[i + 1] >= '0' && u[i + 1] <= '9')
      return false;
  }
  return true;
}

bool is_ascii(const char *s) {
  for (; s && *s; s++)
    if (static_cast<unsigned char>(*s) >= 0x80)
      return false;
  return true;
}

// A new UID: 2.25 followed by a random (version 4) UUID as a decimal
// integer (PS3.5 B.2).
std::string new_uid() {
  unsigned char b[16];
  size_t got = 0;
  while (got < sizeof(b)) {
    ssize_t n = getrandom(b + got, sizeof(b) - got, 0);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      fail(-errno, "getrandom failed");
    }
    got += static_cast<size_t>(n);
  }
  b[6] = static_cast<unsigned char>((b[6] & 0x0F) | 0x40);
  b[8] = static_cast<unsigned char>((b[8] & 0x3F) | 0x80);
  unsigned __int128 v = 0;
  for (unsigned char c : b)
    v = (v << 8) | c;
  char digits[48];
  size_t n = 0;
  do {
    digits[n++] = static_cast<char>('0' + static_cast<int>(v % 10));
    v /= 10;
  } while (v != 0);
  std::string out = "2.25.";
  while (n > 0)
    out += digits[--n];
  return out;
}

// A DS value (at most 16 characters) for a finite double.
std::string decimal_string(double v) {
  char buf[32];
  for (int prec = 12; prec >= 1; prec--) {
    snprintf(buf, sizeof(buf), "%.*g", prec, v);
    if (strlen(buf) <= 16)
      return buf;
  }
  return "0";
}

DSRCodedEntryValue coded(const rr_dicom_code_t &c, const char *what) {
  if (empty(c.scheme) || empty(c.value) || empty(c.meaning))
    fail(RR_EINVAL, std::string(what) + ": scheme, value and meaning are required");
  DSRCodedEntryValue v(c.value, c.scheme, c.meaning);
  if (!v.isValid())
    fail(RR_EINVAL, std::string(what) + ": not a valid code");
  return v;
}

DSRCodedEntryValue dcm(const char *value, const char *meaning) {
  return DSRCodedEntryValue(value, "DCM", meaning);
}

// ---- writer -----------------------------------------------------------------

// The document tree with a cursor; every add checks what DCMTK says.
class Tree {
public:
  explicit Tree(DSRDocumentTree &t) : t_(t) {}

  void add(DSRTypes::E_RelationshipType rel, DSRTypes::E_ValueType vt, DSRTypes::E_AddMode mode,
           const DSRCodedEntryValue &name) {
    if (t_.addContentItem(rel, vt, mode) == 0)
      fail(RR_DICOM_EDCMTK, std::string("content item not allowed here: ") +
                                DSRTypes::valueTypeToDefinedTerm(vt) + " " +
                                name.getCodeMeaning().c_str());
    if (name.isValid())
      check(item().setConceptName(name), "concept name");
  }
  void below(DSRTypes::E_RelationshipType rel, DSRTypes::E_ValueType vt,
             const DSRCodedEntryValue &name = DSRCodedEntryValue()) {
    add(rel, vt, DSRTypes::AM_belowCurrent, name);
  }
  void after(DSRTypes::E_RelationshipType rel, DSRTypes::E_ValueType vt,
             const DSRCodedEntryValue &name = DSRCodedEntryValue()) {
    add(rel, vt, DSRTypes::AM_afterCurrent, name);
  }
  void up() {
    if (t_.goUp() == 0)
      fail(RR_DICOM_EINTERNAL, "tree cursor");
  }
  DSRContentItem &item() {
    return t_.getCurrentContentItem();
  }

  void text(const char *v, const char *what) {
    check(item().setStringValue(v), what);
  }
  void code(const DSRCodedEntryValue &v, const char *what) {
    check(item().setCodeValue(v), what);
  }

private:
  DSRDocumentTree &t_;
};

struct Ref {
  std::string series, sop_class, sop_instance;
};

void validate_region(const rr_dicom_sr_region_t &r, size_t idx, const std::vector<Ref> &refs) {
  std::string where = "finding " + std::to_string(idx) + " region";
  if (r.shape == RR_DICOM_SR_NONE)
    return;
  if (!r.coords || r.n_points == 0)
    fail(RR_EINVAL, where + ": no coordinates");
  size_t dims = r.is_3d ? 3 : 2;
  for (size_t i = 0; i < r.n_points * dims; i++)
    if (!std::isfinite(r.coords[i]))
      fail(RR_EINVAL, where + ": coordinate not finite");
  if (r.is_3d) {
    if (r.shape != RR_DICOM_SR_POINT || r.n_points != 1)
      fail(RR_EINVAL, where + ": 3D regions are single points");
    if (!valid_uid(r.frame_of_reference_uid))
      fail(RR_EINVAL, where + ": frame of reference UID required");
    return;
  }
  if (r.shape == RR_DICOM_SR_POINT && r.n_points != 1)
    fail(RR_EINVAL, where + ": a point has one coordinate pair");
  if (r.shape == RR_DICOM_SR_POLYLINE && r.n_points < 2)
    fail(RR_EINVAL, where + ": a polyline has at least two points");
  if (r.shape == RR_DICOM_SR_ELLIPSE && r.n_points != 4)
    fail(RR_EINVAL, where + ": an ellipse has four points");
  if (r.shape != RR_DICOM_SR_POINT && r.shape != RR_DICOM_SR_POLYLINE &&
      r.shape != RR_DICOM_SR_ELLIPSE)
    fail(RR_EINVAL, where + ": unknown shape");
  if (!valid_uid(r.sop_class_uid) || !valid_uid(r.sop_instance_uid))
    fail(RR_EINVAL, where + ": image SOP class and instance UIDs required");
  for (const Ref &ref : refs)
    if (ref.sop_instance == r.sop_instance_uid && ref.sop_class == r.sop_class_uid)
      return;
  fail(RR_EINVAL, where + ": the image is not among the referenced instances");
}

std::vector<Ref> collect_refs(const rr_dicom_sr_input_t *in) {
  std::vector<Ref> refs;
  if (!in->series && in->n_series)
    fail(RR_EINVAL, "series: NULL array");
  for (size_t s = 0; s < in->n_series; s++) {
    const rr_dicom_sr_series_ref_t &sr = in->series[s];
    if (!valid_uid(sr.series_instance_uid))
      fail(RR_EINVAL, "series " + std::to_string(s) + ": invalid series instance UID");
    if (sr.n_instances && (!sr.sop_class_uids || !sr.sop_instance_uids))
      fail(RR_EINVAL, "series " + std::to_string(s) + ": NULL instance arrays");
    for (size_t i = 0; i < sr.n_instances; i++) {
      if (!valid_uid(sr.sop_class_uids[i]) || !valid_uid(sr.sop_instance_uids[i]))
        fail(RR_EINVAL,
             "series " + std::to_string(s) + " instance " + std::to_string(i) + ": invalid UID");
      refs.push_back(Ref{sr.series_instance_uid, sr.sop_class_uids[i], sr.sop_instance_uids[i]});
    }
  }
  if (refs.empty())
    fail(RR_EINVAL, "no referenced instances");
  return refs;
}

void validate(const rr_dicom_sr_input_t *in, const std::vector<Ref> &refs) {
  if (empty(in->source_path) || empty(in->out_path))
    fail(RR_EINVAL, "source_path and out_path are required");
  const rr_dicom_sr_device_t &d = in->device;
  if (empty(d.name) || empty(d.version) || empty(d.manufacturer))
    fail(RR_EINVAL, "device: name, version and manufacturer are required");
  if (strlen(d.name) > 64 || strlen(d.version) > 64 || strlen(d.manufacturer) > 64 ||
      (d.model_name && strlen(d.model_name) > 64))
    fail(RR_EINVAL, "device: name, version, manufacturer or model longer than 64");
  if (!valid_uid(d.device_uid))
    fail(RR_EINVAL, "device: invalid device UID");
  if (in->series_instance_uid && !valid_uid(in->series_instance_uid))
    fail(RR_EINVAL, "invalid series instance UID");
  if (in->sop_instance_uid && !valid_uid(in->sop_instance_uid))
    fail(RR_EINVAL, "invalid SOP instance UID");
  if (in->series_description && strlen(in->series_description) > 64)
    fail(RR_EINVAL, "series description longer than 64");
  if (!in->findings && in->n_findings)
    fail(RR_EINVAL, "findings: NULL array");
  for (size_t i = 0; i < in->n_findings; i++) {
    const rr_dicom_sr_finding_t &f = in->findings[i];
    std::string where = "finding " + std::to_string(i);
    if (empty(f.tracking_id) || strlen(f.tracking_id) > 64)
      fail(RR_EINVAL, where + ": tracking identifier of 1..64 characters required");
    if (f.tracking_uid && !valid_uid(f.tracking_uid))
      fail(RR_EINVAL, where + ": invalid tracking UID");
    if (std::isnan(f.confidence) || f.confidence > 1.0)
      fail(RR_EINVAL, where + ": confidence outside 0..1");
    if ((!f.measurements && f.n_measurements) || (!f.evaluations && f.n_evaluations))
      fail(RR_EINVAL, where + ": NULL array");
    for (size_t m = 0; m < f.n_measurements; m++) {
      if (!std::isfinite(f.measurements[m].value))
        fail(RR_EINVAL, where + ": measurement not finite");
      if (empty(f.measurements[m].unit))
        fail(RR_EINVAL, where + ": measurement unit required");
    }
    validate_region(f.region, i, refs);
  }
}

void add_observer(Tree &t, const rr_dicom_sr_device_t &d) {
  t.after(DSRTypes::RT_hasObsContext, DSRTypes::VT_Code, dcm("121005", "Observer Type"));
  t.code(dcm("121007", "Device"), "observer type");
  t.after(DSRTypes::RT_hasObsContext, DSRTypes::VT_UIDRef, dcm("121012", "Device Observer UID"));
  t.text(d.device_uid, "device observer UID");
  t.after(DSRTypes::RT_hasObsContext, DSRTypes::VT_Text, dcm("121013", "Device Observer Name"));
  t.text(d.name, "device observer name");
  t.after(DSRTypes::RT_hasObsContext, DSRTypes::VT_Text,
          dcm("121014", "Device Observer Manufacturer"));
  t.text(d.manufacturer, "device observer manufacturer");
  t.after(DSRTypes::RT_hasObsContext, DSRTypes::VT_Text,
          dcm("121015", "Device Observer Model Name"));
  t.text(empty(d.model_name) ? d.name : d.model_name, "device observer model name");
}

void add_region(Tree &t, const rr_dicom_sr_region_t &r) {
  if (r.is_3d) {
    t.after(DSRTypes::RT_contains, DSRTypes::VT_SCoord3D, dcm("111030", "Image Region"));
    DSRSpatialCoordinates3DValue v(DSRTypes::GT3_Point);
    v.getGraphicDataList().addItem(static_cast<Float32>(r.coords[0]),
                                   static_cast<Float32>(r.coords[1]),
                                   static_cast<Float32>(r.coords[2]));
    check(v.setFrameOfReferenceUID(r.frame_of_reference_uid), "frame of reference UID");
    check(t.item().setSpatialCoordinates3D(v), "SCOORD3D");
    return;
  }
  DSRTypes::E_GraphicType gt = r.shape == RR_DICOM_SR_POINT     ? DSRTypes::GT_Point
                               : r.shape == RR_DICOM_SR_ELLIPSE ? DSRTypes::GT_Ellipse
                                                                : DSRTypes::GT_Polyline;
  t.after(DSRTypes::RT_contains, DSRTypes::VT_SCoord, dcm("111030", "Image Region"));
  DSRSpatialCoordinatesValue v(gt);
  for (size_t p = 0; p < r.n_points; p++)
    v.getGraphicDataList().addItem(static_cast<Float32>(r.coords[2 * p]),
                                   static_cast<Float32>(r.coords[2 * p + 1]));
  check(t.item().setSpatialCoordinates(v), "SCOORD");
  t.below(DSRTypes::RT_selectedFrom, DSRTypes::VT_Image);
  DSRImageReferenceValue img(r.sop_class_uid, r.sop_instance_uid);
  if (r.frame > 0)
    img.getFrameList().addItem(static_cast<Sint32>(r.frame));
  check(t.item().setImageReference(img), "image reference");
  t.up();
}

void add_num(Tree &t, const DSRCodedEntryValue &name, double value, const char *unit,
             const char *unit_meaning) {
  t.after(DSRTypes::RT_contains, DSRTypes::VT_Num, name);
  DSRCodedEntryValue u(unit, "UCUM", empty(unit_meaning) ? unit : unit_meaning);
  DSRNumericMeasurementValue num(decimal_string(value).c_str(), u);
  check(t.item().setNumericValue(num), "numeric value");
}

void add_finding(Tree &t, const rr_dicom_sr_finding_t &f, size_t idx, bool first) {
  bool region = f.region.shape != RR_DICOM_SR_NONE;
  t.add(DSRTypes::RT_contains, DSRTypes::VT_Container,
        first ? DSRTypes::AM_belowCurrent : DSRTypes::AM_afterCurrent,
        dcm("125007", "Measurement Group"));
  check(t.item().setTemplateIdentification(region ? "1410" : "1501", "DCMR"), "template");
  t.below(DSRTypes::RT_hasObsContext, DSRTypes::VT_Text, dcm("112039", "Tracking Identifier"));
  t.text(f.tracking_id, "tracking identifier");
  t.after(DSRTypes::RT_hasObsContext, DSRTypes::VT_UIDRef,
          dcm("112040", "Tracking Unique Identifier"));
  std::string uid = f.tracking_uid ? f.tracking_uid : new_uid();
  t.text(uid.c_str(), "tracking UID");
  t.after(DSRTypes::RT_hasConceptMod, DSRTypes::VT_Code, dcm("121071", "Finding"));
  t.code(coded(f.finding, ("finding " + std::to_string(idx)).c_str()), "finding");
  if (region)
    add_region(t, f.region);
  for (size_t m = 0; m < f.n_measurements; m++) {
    const rr_dicom_sr_measurement_t &mm = f.measurements[m];
    add_num(t, coded(mm.name, "measurement"), mm.value, mm.unit, mm.unit_meaning);
  }
  if (f.confidence >= 0)
    add_num(t, dcm("111012", "Certainty of Finding"), f.confidence, "1", "no units");
  for (size_t e = 0; e < f.n_evaluations; e++) {
    t.after(DSRTypes::RT_contains, DSRTypes::VT_Code,
            coded(f.evaluations[e].name, "evaluation name"));
    t.code(coded(f.evaluations[e].value, "evaluation value"), "evaluation value");
  }
  t.up();
}

void add_contributing_equipment(DcmDataset *ds, const rr_dicom_sr_device_t &d) {
  DcmItem *item = nullptr;
  check(ds->findOrCreateSequenceItem(DCM_ContributingEquipmentSequence, item, -2),
        "contributing equipment");
  check(item->putAndInsertString(DCM_Manufacturer, d.manufacturer), "manufacturer");
  check(item->putAndInsertString(DCM_ManufacturerModelName, d.name), "model name");
  check(item->putAndInsertString(DCM_SoftwareVersions, d.version), "software versions");
  check(item->putAndInsertString(DCM_DeviceUID, d.device_uid), "device UID");
  OFString now;
  DcmDateTime::getCurrentDateTime(now, OFTrue, OFFalse, OFTrue);
  check(item->putAndInsertOFStringArray(DCM_ContributionDateTime, now), "contribution datetime");
  DcmItem *purpose = nullptr;
  check(item->findOrCreateSequenceItem(DCM_PurposeOfReferenceCodeSequence, purpose, -2),
        "purpose of reference");
  rr_dicom_code_t def = {"DCM", "109103", "Modifying Equipment"};
  const rr_dicom_code_t &p = d.purpose_of_reference ? *d.purpose_of_reference : def;
  DSRCodedEntryValue pv = coded(p, "purpose of reference");
  check(purpose->putAndInsertString(DCM_CodeValue, pv.getCodeValue().c_str()), "code value");
  check(purpose->putAndInsertString(DCM_CodingSchemeDesignator,
                                    pv.getCodingSchemeDesignator().c_str()),
        "coding scheme");
  check(purpose->putAndInsertString(DCM_CodeMeaning, pv.getCodeMeaning().c_str()), "code meaning");
}

// Character set of the SR: the source's, or UTF-8 when our own texts need
// it and the source is plain ASCII.
std::string character_set(DcmDataset *src, const rr_dicom_sr_input_t *in) {
  OFString cs;
  src->findAndGetOFStringArray(DCM_SpecificCharacterSet, cs);
  bool ascii = is_ascii(in->device.name) && is_ascii(in->device.manufacturer) &&
               is_ascii(in->device.model_name) && is_ascii(in->device.version) &&
               is_ascii(in->series_description) && is_ascii(in->manufacturer) &&
               is_ascii(in->procedure.meaning);
  for (size_t i = 0; ascii && i < in->n_findings; i++) {
    const rr_dicom_sr_finding_t &f = in->findings[i];
    ascii = is_ascii(f.tracking_id) && is_ascii(f.finding.meaning);
    for (size_t m = 0; ascii && m < f.n_measurements; m++)
      ascii = is_ascii(f.measurements[m].name.meaning) && is_ascii(f.measurements[m].unit_meaning);
    for (size_t e = 0; ascii && e < f.n_evaluations; e++)
      ascii = is_ascii(f.evaluations[e].name.meaning) && is_ascii(f.evaluations[e].value.meaning);
  }
  std::string s = cs.c_str();
  if (ascii)
    return s;
  if (s.empty() || s == "ISO_IR 6" || s == "ISO_IR 192")
    return "ISO_IR 192";
  fail(RR_EINVAL, "non-ASCII text for a source in character set " + s);
}

int fsync_path(const char *path, int flags) {
  int fd = open(path, flags | O_CLOEXEC);
  if (fd < 0)
    return -errno;
  int rc = fsync(fd) == 0 ? 0 : -errno;
  close(fd);
  return rc;
}

std::atomic<unsigned> g_tmp_seq{0};

void save_durably(DcmFileFormat &ff, const std::string &out) {
  std::string tmp =
      out + ".rr-tmp." + std::to_string(getpid()) + "." + std::to_string(g_tmp_seq.fetch_add(1));
  OFCondition c = ff.saveFile(OFFilename(tmp.c_str()), EXS_LittleEndianExplicit);
  if (c.bad()) {
    unlink(tmp.c_str());
    fail(RR_EIO, std::string("cannot write the SR file: ") + c.text());
  }
  int rc = fsync_path(tmp.c_str(), O_RDONLY);
  if (rc == 0 && rename(tmp.c_str(), out.c_str()) != 0)
    rc = -errno;
  if (rc != 0) {
    unlink(tmp.c_str());
    fail(rc, std::string("cannot write the SR file: ") + strerror(-rc));
  }
  size_t slash = out.find_last_of('/');
  std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : out.substr(0, slash);
  rc = fsync_path(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (rc != 0)
    fail(rc, std::string("cannot fsync the SR directory: ") + strerror(-rc));
}

int write_sr(const rr_dicom_sr_input_t *in, rr_dicom_sr_result_t *out) {
  if (!in)
    fail(RR_EINVAL, "no input");
  std::call_once(g_sr_once, sr_global_setup);
  if (!dcmDataDict.isDictionaryLoaded())
    fail(RR_DICOM_EDCMTK, "DICOM data dictionary not loaded");
  std::vector<Ref> refs = collect_refs(in);
  validate(in, refs);

  DcmFileFormat src;
  OFCondition c = src.loadFileUntilTag(OFFilename(in->source_path), EXS_Unknown, EGL_noChange,
                                       DCM_MaxReadLength, ERM_autoDetect, DCM_PixelData);
  if (c.bad())
    fail(RR_ENOTFOUND, std::string("source instance: ") + c.text());
  DcmDataset *sds = src.getDataset();
  OFString study;
  if (sds->findAndGetOFString(DCM_StudyInstanceUID, study).bad() || !valid_uid(study.c_str()))
    fail(RR_EINVAL, "source instance has no valid Study Instance UID");
  std::string charset = character_set(sds, in);

  DSRDocument doc(DSRTypes::DT_Comprehensive3DSR);
  check(doc.readStudyData(*sds), "source study attributes");
  doc.createNewSeries();
  if (!charset.empty())
    check(doc.setSpecificCharacterSet(charset.c_str()), "character set");
  check(doc.setSeriesDescription(in->series_description ? in->series_description : "AI Results"),
        "series description");
  check(
      doc.setSeriesNumber(std::to_string(in->series_number > 0 ? in->series_number : 900).c_str()),
      "series number");
  check(doc.setInstanceNumber(
            std::to_string(in->instance_number > 0 ? in->instance_number : 1).c_str()),
        "instance number");
  check(doc.setManufacturer(in->manufacturer ? in->manufacturer : "radrelay"), "manufacturer");
  for (const Ref &r : refs)
    check(doc.getCurrentRequestedProcedureEvidence().addItem(
              study, r.series.c_str(), r.sop_class.c_str(), r.sop_instance.c_str()),
          "evidence");

  Tree t(doc.getTree());
  t.below(DSRTypes::RT_isRoot, DSRTypes::VT_Container, dcm("126000", "Imaging Measurement Report"));
  check(t.item().setTemplateIdentification("1500", "DCMR"), "root template");
  t.below(DSRTypes::RT_hasConceptMod, DSRTypes::VT_Code,
          dcm("121049", "Language of Content Item and Descendants"));
  t.code(DSRCodedEntryValue("en-US", "RFC5646", "English (United States)"), "language");
  add_observer(t, in->device);
  t.after(DSRTypes::RT_hasConceptMod, DSRTypes::VT_Code, dcm("121058", "Procedure reported"));
  t.code(coded(in->procedure, "procedure reported"), "procedure reported");

  t.after(DSRTypes::RT_contains, DSRTypes::VT_Container, dcm("111028", "Image Library"));
  t.below(DSRTypes::RT_contains, DSRTypes::VT_Container, dcm("126200", "Image Library Group"));
  for (size_t i = 0; i < refs.size(); i++) {
    if (i == 0)
      t.below(DSRTypes::RT_contains, DSRTypes::VT_Image);
    else
      t.after(DSRTypes::RT_contains, DSRTypes::VT_Image);
    check(t.item().setImageReference(
              DSRImageReferenceValue(refs[i].sop_class.c_str(), refs[i].sop_instance.c_str())),
          "library image");
  }
  t.up();
  t.up();

  t.after(DSRTypes::RT_contains, DSRTypes::VT_Container, dcm("126010", "Imaging Measurements"));
  for (size_t i = 0; i < in->n_findings; i++)
    add_finding(t, in->findings[i], i, i == 0);

  if (!doc.isValid())
    fail(RR_DICOM_EDCMTK, "DCMTK reports the document as invalid");

  DcmFileFormat ff;
  DcmDataset *ds = ff.getDataset();
  check(doc.write(*ds), "SR document");
  std::string sop = in->sop_instance_uid ? in->sop_instance_uid : new_uid();
  std::string series = in->series_instance_uid ? in->series_instance_uid : new_uid();
  check(ds->putAndInsertString(DCM_SOPInstanceUID, sop.c_str()), "SOP instance UID");
  check(ds->putAndInsertString(DCM_SeriesInstanceUID, series.c_str()), "series instance UID");
  add_contributing_equipment(ds, in->device);
  save_durably(ff, in->out_path);

  if (out) {
    snprintf(out->sop_instance_uid, sizeof(out->sop_instance_uid), "%s", sop.c_str());
    snprintf(out->series_instance_uid, sizeof(out->series_instance_uid), "%s", series.c_str());
  }
  rr_log(RR_LOG_INFO, kLogModule, "event=sr_written findings=%zu references=%zu algorithm=%s",
         in->n_findings, refs.size(), in->device.name);
  rr_log(RR_LOG_DEBUG, kLogModule, "event=sr_written_ids study=%s series=%s sop_instance=%s",
         study.c_str(), series.c_str(), sop.c_str());
  return 0;
}

// ---- reader -----------------------------------------------------------------

struct Finding {
  rr_dicom_sr_finding_t f{};
  std::vector<double> coords;
  std::vector<rr_dicom_sr_measurement_t> measurements;
  std::vector<rr_dicom_sr_evaluation_t> evaluations;
};

// The summary and the storage its pointers point into.
struct SummaryStore : rr_dicom_sr_summary_t {
  std::deque<std::string> strings;
  std::deque<Finding> findings;
  std::vector<rr_dicom_sr_finding_t> finding_array;
  rr_dicom_code_t purpose{};

  const char *keep(const std::string &s) {
    strings.push_back(s);
    return strings.back().c_str();
  }
  rr_dicom_code_t code(const DSRCodedEntryValue &v) {
    return rr_dicom_code_t{keep(v.getCodingSchemeDesignator()), keep(v.getCodeValue()),
                           keep(v.getCodeMeaning())};
  }
};

bool is(const DSRCodedEntryValue &v, const char *scheme, const char *value) {
  return v.getCodingSchemeDesignator() == scheme && v.getCodeValue() == value;
}

void read_region(SummaryStore &s, DSRDocumentTree &t, Finding &fd) {
  DSRContentItem &it = t.getCurrentContentItem();
  rr_dicom_sr_region_t &r = fd.f.region;
  if (it.getValueType() == DSRTypes::VT_SCoord3D) {
    DSRSpatialCoordinates3DValue v = it.getSpatialCoordinates3D();
    r.is_3d = 1;
    r.shape = v.getGraphicType() == DSRTypes::GT3_Point ? RR_DICOM_SR_POINT : RR_DICOM_SR_NONE;
    const DSRGraphicData3DList &l = v.getGraphicDataList();
    for (size_t i = 1; i <= l.getNumberOfItems(); i++) {
      Float32 x = 0, y = 0, z = 0;
      l.getItem(i, x, y, z);
      fd.coords.insert(fd.coords.end(), {x, y, z});
    }
    r.n_points = l.getNumberOfItems();
    r.frame_of_reference_uid = s.keep(v.getFrameOfReferenceUID());
    r.sop_class_uid = r.sop_instance_uid = "";
    return;
  }
  DSRSpatialCoordinatesValue v = it.getSpatialCoordinates();
  switch (v.getGraphicType()) {
  case DSRTypes::GT_Point: r.shape = RR_DICOM_SR_POINT; break;
  case DSRTypes::GT_Polyline: r.shape = RR_DICOM_SR_POLYLINE; break;
  case DSRTypes::GT_Ellipse: r.shape = RR_DICOM_SR_ELLIPSE; break;
  default: r.shape = RR_DICOM_SR_NONE; break;
  }
  const DSRGraphicDataList &l = v.getGraphicDataList();
  for (size_t i = 1; i <= l.getNumberOfItems(); i++) {
    Float32 x = 0, y = 0;
    l.getItem(i, x, y);
    fd.coords.insert(fd.coords.end(), {x, y});
  }
  r.n_points = l.getNumberOfItems();
  r.frame_of_reference_uid = "";
  r.sop_class_uid = r.sop_instance_uid = "";
  if (t.gotoChild()) {
    do {
      DSRContentItem &img = t.getCurrentContentItem();
      if (img.getValueType() == DSRTypes::VT_Image &&
          img.getRelationshipType() == DSRTypes::RT_selectedFrom) {
        const DSRImageReferenceValue &ref = img.getImageReference();
        r.sop_class_uid = s.keep(ref.getSOPClassUID());
        r.sop_instance_uid = s.keep(ref.getSOPInstanceUID());
        Sint32 frame = 0;
        if (ref.getFrameList().getItem(1, frame).good() && frame > 0)
          r.frame = static_cast<unsigned>(frame);
      }
    } while (t.gotoNext());
    t.goUp();
  }
}

void read_group(SummaryStore &s, DSRDocumentTree &t) {
  s.findings.emplace_back();
  Finding &fd = s.findings.back();
  fd.f.confidence = -1;
  fd.f.tracking_id = fd.f.tracking_uid = "";
  fd.f.finding = rr_dicom_code_t{"", "", ""};
  fd.f.region.sop_class_uid = fd.f.region.sop_instance_uid = "";
  fd.f.region.frame_of_reference_uid = "";
  if (!t.gotoChild())
    return;
  do {
    DSRContentItem &it = t.getCurrentContentItem();
    const DSRCodedEntryValue &name = it.getConceptName();
    switch (it.getValueType()) {
    case DSRTypes::VT_Text:
      if (is(name, "DCM", "112039"))
        fd.f.tracking_id = s.keep(it.getStringValue());
      break;
    case DSRTypes::VT_UIDRef:
      if (is(name, "DCM", "112040"))
        fd.f.tracking_uid = s.keep(it.getStringValue());
      break;
    case DSRTypes::VT_Code:
      if (is(name, "DCM", "121071")) {
        fd.f.finding = s.code(it.getCodeValue());
      } else {
        fd.evaluations.push_back(rr_dicom_sr_evaluation_t{s.code(name), s.code(it.getCodeValue())});
      }
      break;
    case DSRTypes::VT_Num: {
      const DSRNumericMeasurementValue &nv = it.getNumericValue();
      double v = strtod(nv.getNumericValue().c_str(), nullptr);
      if (is(name, "DCM", "111012")) {
        fd.f.confidence = v;
      } else {
        const DSRCodedEntryValue &u = nv.getMeasurementUnit();
        fd.measurements.push_back(rr_dicom_sr_measurement_t{
            s.code(name), v, s.keep(u.getCodeValue()), s.keep(u.getCodeMeaning())});
      }
      break;
    }
    case DSRTypes::VT_SCoord:
    case DSRTypes::VT_SCoord3D: read_region(s, t, fd); break;
    default: break;
    }
  } while (t.gotoNext());
  t.goUp();
  fd.f.region.coords = fd.coords.data();
  fd.f.measurements = fd.measurements.data();
  fd.f.n_measurements = fd.measurements.size();
  fd.f.evaluations = fd.evaluations.data();
  fd.f.n_evaluations = fd.evaluations.size();
}

void read_contributing_equipment(SummaryStore &s, DcmDataset *ds) {
  rr_dicom_sr_device_t &d = s.device;
  DcmItem *item = nullptr;
  if (ds->findAndGetSequenceItem(DCM_ContributingEquipmentSequence, item, 0).bad() || !item)
    return;
  OFString v;
  if (item->findAndGetOFStringArray(DCM_ManufacturerModelName, v).good())
    d.name = s.keep(v);
  if (item->findAndGetOFStringArray(DCM_SoftwareVersions, v).good())
    d.version = s.keep(v);
  DcmItem *p = nullptr;
  if (item->findAndGetSequenceItem(DCM_PurposeOfReferenceCodeSequence, p, 0).good() && p) {
    OFString cv, cs, cm;
    p->findAndGetOFString(DCM_CodeValue, cv);
    p->findAndGetOFString(DCM_CodingSchemeDesignator, cs);
    p->findAndGetOFString(DCM_CodeMeaning, cm);
    s.purpose = rr_dicom_code_t{s.keep(cs), s.keep(cv), s.keep(cm)};
    d.purpose_of_reference = &s.purpose;
  }
}

int read_summary(const char *path, rr_dicom_sr_summary_t **out) {
  if (empty(path) || !out)
    fail(RR_EINVAL, "path and out are required");
  std::call_once(g_sr_once, sr_global_setup);
  DcmFileFormat ff;
  OFCondition c = ff.loadFile(OFFilename(path));
  if (c.bad())
    fail(RR_ENOTFOUND, std::string("cannot read: ") + c.text());
  DcmDataset *ds = ff.getDataset();
  DSRDocument doc;
  c = doc.read(*ds);
  if (c.bad())
    fail(RR_EPARSE, std::string("not a valid SR document: ") + c.text());
  if (!doc.isValid())
    fail(RR_EPARSE, "DCMTK reports the document as invalid");
  DSRDocumentTree &t = doc.getTree();
  if (!t.isValidDocumentTree())
    fail(RR_EPARSE, "invalid document tree");
  OFString tid, mapping;
  if (t.getTemplateIdentification(tid, mapping).bad() || tid != "1500" || mapping != "DCMR")
    fail(RR_EPARSE, "root is not DCMR TID 1500");

  std::unique_ptr<SummaryStore> s(new SummaryStore());
  rr_dicom_sr_summary_t &p = *s;
  OFString v;
  doc.getSOPClassUID(v);
  p.sop_class_uid = s->keep(v);
  doc.getSOPInstanceUID(v);
  p.sop_instance_uid = s->keep(v);
  doc.getStudyInstanceUID(v);
  p.study_instance_uid = s->keep(v);
  doc.getSeriesInstanceUID(v);
  p.series_instance_uid = s->keep(v);
  p.template_id = s->keep(tid);
  p.procedure = rr_dicom_code_t{"", "", ""};
  p.device.name = p.device.version = p.device.manufacturer = p.device.model_name =
      p.device.device_uid = "";
  p.n_evidence_instances = doc.getCurrentRequestedProcedureEvidence().getNumberOfInstances();

  t.gotoRoot();
  p.title = s->code(t.getCurrentContentItem().getConceptName());
  if (t.gotoChild()) {
    do {
      DSRContentItem &it = t.getCurrentContentItem();
      const DSRCodedEntryValue &name = it.getConceptName();
      if (it.getValueType() == DSRTypes::VT_Code && is(name, "DCM", "121058")) {
        p.procedure = s->code(it.getCodeValue());
      } else if (it.getValueType() == DSRTypes::VT_UIDRef && is(name, "DCM", "121012")) {
        p.device.device_uid = s->keep(it.getStringValue());
      } else if (it.getValueType() == DSRTypes::VT_Text && is(name, "DCM", "121014")) {
        p.device.manufacturer = s->keep(it.getStringValue());
      } else if (it.getValueType() == DSRTypes::VT_Text && is(name, "DCM", "121015")) {
        p.device.model_name = s->keep(it.getStringValue());
      } else if (it.getValueType() == DSRTypes::VT_Container && is(name, "DCM", "111028")) {
        if (t.gotoChild()) {
          do {
            if (t.gotoChild()) {
              do {
                if (t.getCurrentContentItem().getValueType() == DSRTypes::VT_Image)
                  p.n_library_images++;
              } while (t.gotoNext());
              t.goUp();
            }
          } while (t.gotoNext());
          t.goUp();
        }
      } else if (it.getValueType() == DSRTypes::VT_Container && is(name, "DCM", "126010")) {
        if (t.gotoChild()) {
          do {
            if (is(t.getCurrentContentItem().getConceptName(), "DCM", "125007"))
              read_group(*s, t);
          } while (t.gotoNext());
          t.goUp();
        }
      }
    } while (t.gotoNext());
  }
  read_contributing_equipment(*s, ds);

  for (Finding &f : s->findings)
    s->finding_array.push_back(f.f);
  p.findings = s->finding_array.data();
  p.n_findings = s->finding_array.size();
  *out = s.release();
  return 0;
}

} // namespace

extern "C" int rr_dicom_sr_write(const rr_dicom_sr_input_t *in, rr_dicom_sr_result_t *out,
                                 rr_dicom_sr_error_t *err) {
  set_error(err, "");
  try {
    return write_sr(in, out);
  } catch (const Fail &f) {
    set_error(err, f.text);
    rr_log(RR_LOG_WARN, kLogModule, "event=sr_write_failed err=\"%s\"", f.text.c_str());
    return f.code;
  } catch (const std::bad_alloc &) {
    set_error(err, "out of memory");
    return RR_ENOMEM;
  } catch (...) {
    set_error(err, "internal error");
    return RR_DICOM_EINTERNAL;
  }
}

extern "C" int rr_dicom_sr_new_uid(char out[65]) {
  out[0] = '\0';
  try {
    snprintf(out, 65, "%s", new_uid().c_str());
    return 0;
  } catch (const Fail &f) {
    return f.code;
  } catch (...) {
    return RR_ENOMEM;
  }
}

extern "C" int rr_dicom_sr_read_summary(const char *path, rr_dicom_sr_summary_t **out,
                                        rr_dicom_sr_error_t *err) {
  set_error(err, "");
  if (out)
    *out = nullptr;
  try {
    return read_summary(path, out);
  } catch (const Fail &f) {
    set_error(err, f.text);
    return f.code;
  } catch (const std::bad_alloc &) {
    set_error(err, "out of memory");
    return RR_ENOMEM;
  } catch (...) {
    set_error(err, "internal error");
    return RR_DICOM_EINTERNAL;
  }
}

extern "C" void rr_dicom_sr_summary_free(rr_dicom_sr_summary_t *s) {
  // Every summary handed out is the base of a SummaryStore.
  delete static_cast<SummaryStore *>(s);
}
