-- orders: the RIS/EHR feed (ADT, ORM^O01, OMI^O23).
--
-- ADT: the patient is remembered in the engine's store (to enrich later
-- orders) and the update goes on to the patient index as it is.
-- Orders: checked (an order without accession cannot be matched to its
-- study, so it is refused and the RIS sees why), normalized (priority), and
-- kept in the engine's order store (orders.keep), which arriving studies
-- are matched against. Status-only updates are filtered.
local rad = require("radiology")

function on_message(msg, ctx)
  local kind = msg:get("MSH-9.1")
  if kind == "ADT" then
    local mrn = rad.mrn(msg)
    if mrn and mrn ~= "" then
      store.set("patient:" .. mrn, json.encode({
        family = msg:get("PID-5.1"), given = msg:get("PID-5.2"),
        birth_date = msg:get("PID-7"), sex = msg:get("PID-8"),
        patient_class = msg:get("PV1-2"),
      }))
    end
    ctx:route("patient_index", msg)
    return
  end

  local control = msg:get("ORC-1")
  if control == "SC" then
    ctx:filter("order status update only")
    return
  end

  local accession = rad.accession(msg)
  if not accession then
    ctx:reject("order without accession number (OBR-18 / IPC-1)")
    return
  end

  local priority = rad.priority(msg)
  ctx:log("info", "order", control, priority) -- no identifiers above debug
  local mrn = rad.mrn(msg)
  -- What the ADT feed told us about the patient, if it came first.
  local known = mrn and store.get("patient:" .. mrn)
  -- Kept in the engine's order store with this message: arriving studies
  -- are matched against it (accession, Study Instance UID, patient +
  -- modality + time) and carry it to routing.
  orders.keep(rad.order(msg, known and json.decode(known)))
end
