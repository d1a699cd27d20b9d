-- reports: results and signed reports from the RIS (ORU^R01).
--
-- Final reports (OBR-25 F or C) are what an AI finding is confirmed or
-- overridden against: routed to the AI audit as a JSON verdict record.
-- Preliminary results are kept in the journal only.
local rad = require("radiology")

function on_message(msg, ctx)
  local status = msg:get("OBR-25")
  if status ~= "F" and status ~= "C" then
    ctx:filter("not a final report (OBR-25 " .. status .. ")")
    return
  end
  local study_uid
  for i = 1, msg:count("OBX") do
    if msg:get("OBX[" .. i .. "]-3.1") == "113014" then
      study_uid = msg:get("OBX[" .. i .. "]-5")
    end
  end
  ctx:route("report_verdicts", {
    accession = rad.accession(msg),
    mrn = rad.mrn(msg),
    study_uid = study_uid,
    status = status == "C" and "corrected" or "final",
    observed = msg:get("OBR-7"),
    radiologist = msg:get("OBR-32.1.1"),
  })
end
